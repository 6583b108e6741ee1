from chatcli.launch import main

main()
